"""OpenAI's generation options as the official client sends them, on a real server on
loopback: ``n`` choices, ``logprobs`` / ``top_logprobs`` against a greedy reference
computed by hand with plain transformers, seeds (same seed, same text; other seeds,
other text), and usage in streamed answers (``stream_options.include_usage``)."""

from __future__ import annotations

import openai
import pytest
import torch

from serve_helpers import PROMPTS, Server, make_toy


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    return make_toy(tmp_path_factory.mktemp("generate"), 2)


@pytest.fixture(scope="module")
def client(toy):
    adapters = [f"--adapter={name}={toy['root'] / name}" for name in toy["names"]]
    with Server(["--model", str(toy["model_dir"]), *adapters], toy["tmp"] / "generate.log") as srv:
        yield openai.OpenAI(base_url=srv.url + "/v1", api_key="unused", max_retries=0)


def greedy_steps(toy, adapter: str, prompt_ids: list[int], max_tokens: int, k: int) -> list[tuple]:
    """``(token, logprob, [(id, logprob)] * k)`` per generated token, by hand: the adapter
    merged into a plain transformers model, full forward each step, log_softmax."""
    model = toy["refs"].model(toy["root"] / adapter)
    ids, steps = list(prompt_ids), []
    with torch.inference_mode():
        for _ in range(max_tokens):
            logprobs = torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0, -1].double(), -1)
            token = int(logprobs.argmax())
            if token == toy["tokenizer"].eos_token_id:
                break
            values, top = torch.topk(logprobs, k)
            steps.append((token, float(logprobs[token]), list(zip(top.tolist(), values.tolist()))))
            ids.append(token)
    return steps


def test_completion_logprobs_match_a_hand_computed_greedy_reference(client, toy):
    tokenizer = toy["tokenizer"]
    steps = greedy_steps(toy, "task0", tokenizer.encode(PROMPTS[3]), 8, 3)
    answer = client.completions.create(model="task0", prompt=PROMPTS[3], max_tokens=8, temperature=0, logprobs=3)
    logprobs = answer.choices[0].logprobs
    assert logprobs.tokens == [tokenizer.decode([t]) for t, _, _ in steps]
    assert logprobs.token_logprobs == pytest.approx([lp for _, lp, _ in steps], abs=1e-4)
    for got, (_, _, top) in zip(logprobs.top_logprobs, steps):
        expected = {tokenizer.decode([t]): lp for t, lp in top}  # a dict, as OpenAI's legacy field is
        assert list(got) == list(expected) and list(got.values()) == pytest.approx(list(expected.values()), abs=1e-4)
    assert "".join(logprobs.tokens) == answer.choices[0].text
    assert logprobs.text_offset[0] == 0 and logprobs.text_offset[1] == len(logprobs.tokens[0])


def test_chat_logprobs_streamed_and_whole_agree_with_the_reference(client, toy):
    tokenizer = toy["tokenizer"]
    messages = [{"role": "user", "content": PROMPTS[0]}]
    prompt_ids = tokenizer.encode(tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False),
                                  add_special_tokens=False)
    steps = greedy_steps(toy, "task1", prompt_ids, 6, 2)
    whole = client.chat.completions.create(model="task1", messages=messages, max_tokens=6, temperature=0,
                                           logprobs=True, top_logprobs=2)
    content = whole.choices[0].logprobs.content
    assert [c.token for c in content] == [tokenizer.decode([t]) for t, _, _ in steps]
    assert [c.logprob for c in content] == pytest.approx([lp for _, lp, _ in steps], abs=1e-4)
    assert [[t.token for t in c.top_logprobs] for c in content] == [
        [tokenizer.decode([t]) for t, _ in top] for _, _, top in steps]
    assert content[0].bytes == list(content[0].token.encode())
    streamed = [entry for chunk in client.chat.completions.create(
        model="task1", messages=messages, max_tokens=6, temperature=0, logprobs=True, top_logprobs=2, stream=True)
        if chunk.choices and chunk.choices[0].logprobs for entry in chunk.choices[0].logprobs.content]
    # the same tokens; the logprobs to float rounding (two forwards need not match to the last bit:
    # a CPU GEMM's summation order can follow its buffers' alignment)
    assert [e.token for e in streamed] == [c.token for c in content]
    assert [e.logprob for e in streamed] == pytest.approx([c.logprob for c in content], abs=1e-5)


def test_chat_continues_the_last_message_and_echoes_it(client, toy):
    """vLLM's chat extensions: ``continue_final_message`` (the prompt ends inside the last
    message), ``add_generation_prompt`` false (the answer takes the last message's role) and
    ``echo`` (the answer starts with the last message's content), whole and streamed."""
    tokenizer = toy["tokenizer"]
    messages = [{"role": "user", "content": PROMPTS[2]}, {"role": "assistant", "content": "The quick"}]
    prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=False, continue_final_message=True,
                                           tokenize=False)
    assert prompt.endswith("<|assistant|>The quick")  # no end-of-turn after the partial answer
    expected = toy["refs"].text(toy["root"] / "task0", tokenizer.encode(prompt, add_special_tokens=False), 6)
    extra = {"add_generation_prompt": False, "continue_final_message": True}
    whole = client.chat.completions.create(model="task0", messages=messages, max_tokens=6, temperature=0,
                                           extra_body=extra)
    assert whole.choices[0].message.content == expected and whole.choices[0].message.role == "assistant"
    echoed = client.chat.completions.create(model="task0", messages=messages, max_tokens=6, temperature=0,
                                            extra_body={**extra, "echo": True}, n=2)
    assert [c.message.content for c in echoed.choices] == ["The quick" + expected] * 2
    assert echoed.usage.completion_tokens == whole.usage.completion_tokens * 2  # the echo is not generated
    chunks = list(client.chat.completions.create(model="task0", messages=messages, max_tokens=6, temperature=0,
                                                 extra_body={**extra, "echo": True}, stream=True))
    deltas = [c.choices[0].delta for c in chunks if c.choices]
    assert deltas[0].role == "assistant" and deltas[1].content == "The quick"
    assert "".join(d.content or "" for d in deltas) == "The quick" + expected
    # a new assistant turn (the default): the user's last message is not the answer's role, so nothing is echoed
    user_only = messages[:1]
    plain = client.chat.completions.create(model="task0", messages=user_only, max_tokens=4, temperature=0)
    again = client.chat.completions.create(model="task0", messages=user_only, max_tokens=4, temperature=0,
                                           extra_body={"echo": True})
    assert again.choices[0].message.content == plain.choices[0].message.content
    with pytest.raises(openai.UnprocessableEntityError, match="add_generation_prompt to false"):
        client.chat.completions.create(model="task0", messages=messages, max_tokens=2,
                                       extra_body={"continue_final_message": True})


def test_n_greedy_choices_are_the_reference_and_usage_counts_them_all(client, toy):
    answer = client.completions.create(model="task0", prompt=PROMPTS[1], max_tokens=7, temperature=0, n=3)
    expected = toy["refs"].text(toy["root"] / "task0", toy["tokenizer"].encode(PROMPTS[1]), 7)
    assert [c.index for c in answer.choices] == [0, 1, 2]
    assert [c.text for c in answer.choices] == [expected] * 3
    steps = len(greedy_steps(toy, "task0", toy["tokenizer"].encode(PROMPTS[1]), 7, 1))
    per_choice = steps if steps == 7 else steps + 1  # an end-of-sequence token counts as generated
    assert answer.usage.completion_tokens == 3 * per_choice


def test_seeds_repeat_and_differ(client):
    def sample(seed, n=1):
        answer = client.completions.create(model="task1", prompt=PROMPTS[4], max_tokens=12, temperature=1.0,
                                           seed=seed, n=n)
        return [c.text for c in answer.choices]

    assert sample(11) == sample(11)
    assert sample(11) != sample(12)
    three = sample(11, n=3)
    assert three == sample(11, n=3) and three[0] == sample(11)[0]
    assert len(set(three)) == 3  # each choice draws its own tokens


def test_streamed_choices_and_usage_when_asked(client, toy):
    messages = [{"role": "user", "content": PROMPTS[2]}]
    whole = client.chat.completions.create(model="task0", messages=messages, max_tokens=9, temperature=0, n=2)
    chunks = list(client.chat.completions.create(model="task0", messages=messages, max_tokens=9, temperature=0, n=2,
                                                 stream=True, stream_options={"include_usage": True}))
    texts = {0: "", 1: ""}
    for chunk in chunks[:-1]:
        assert chunk.usage is None
        for choice in chunk.choices:
            texts[choice.index] += choice.delta.content or ""
    assert [texts[0], texts[1]] == [c.message.content for c in whole.choices]
    assert chunks[-1].choices == [] and chunks[-1].usage.model_dump() == whole.usage.model_dump()
    plain = list(client.completions.create(model="task0", prompt="fox", max_tokens=3, temperature=0, stream=True))
    assert all(getattr(c, "usage", None) is None for c in plain)  # not asked: no usage chunk


def prompt_reference(toy, adapter: str, prompt_ids: list[int], k: int) -> list[tuple]:
    """``(logprob, [(id, logprob)] * k)`` of each prompt token after the first, by hand (one full forward)."""
    model = toy["refs"].model(toy["root"] / adapter)
    with torch.inference_mode():
        logprobs = torch.log_softmax(model(input_ids=torch.tensor([prompt_ids])).logits[0].double(), -1)
    rows = []
    for t in range(1, len(prompt_ids)):
        values, top = torch.topk(logprobs[t - 1], k)
        rows.append((float(logprobs[t - 1, prompt_ids[t]]), list(zip(top.tolist(), values.tolist()))))
    return rows


def test_echo_with_logprobs_scores_the_prompt_as_a_loglikelihood_evaluation_asks(client, toy):
    # what lm-eval-harness's local-completions sends for a loglikelihood request: token ids,
    # echo, logprobs 1, max_tokens 1, temperature 0; it sums token_logprobs[ctxlen:-1]
    tokenizer = toy["tokenizer"]
    context, continuation = tokenizer.encode(PROMPTS[0]), tokenizer.encode(" jumps over", add_special_tokens=False)
    ids = context + continuation
    answer = client.completions.create(model="task1", prompt=[ids, tokenizer.encode(PROMPTS[1])], max_tokens=1,
                                       temperature=0, logprobs=1, echo=True)
    logprobs = answer.choices[0].logprobs
    reference = prompt_reference(toy, "task1", ids, 1)
    assert len(logprobs.token_logprobs) == len(ids) + 1  # the prompt's tokens, then the one generated
    assert logprobs.token_logprobs[0] is None and logprobs.top_logprobs[0] is None  # nothing precedes it
    assert logprobs.token_logprobs[1:len(ids)] == pytest.approx([lp for lp, _ in reference], abs=1e-4)
    for got, (_, top) in zip(logprobs.top_logprobs[1:len(ids)], reference):
        assert list(got) == [tokenizer.decode([t]) for t, _ in top]
    loglikelihood = sum(logprobs.token_logprobs[len(context):-1])
    assert loglikelihood == pytest.approx(sum(lp for lp, _ in reference[len(context) - 1:]), abs=1e-3)
    assert answer.choices[0].text.startswith(tokenizer.decode(ids))
    assert answer.choices[1].text.startswith(PROMPTS[1])  # the other prompt, echoed as given
    alone = client.completions.create(model="task1", prompt=ids, max_tokens=0, logprobs=0, echo=True)
    assert alone.choices[0].text == tokenizer.decode(ids) and alone.usage.completion_tokens == 0
    assert alone.choices[0].logprobs.token_logprobs[1:] == pytest.approx(logprobs.token_logprobs[1:len(ids)], abs=1e-5)
    assert alone.choices[0].finish_reason == "length"


def test_echo_streams_the_prompt_first_and_matches_the_whole_answer(client):
    whole = client.completions.create(model="task0", prompt=PROMPTS[2], max_tokens=5, temperature=0, echo=True,
                                      logprobs=2)
    chunks = list(client.completions.create(model="task0", prompt=PROMPTS[2], max_tokens=5, temperature=0,
                                            echo=True, logprobs=2, stream=True))
    assert chunks[0].choices[0].text == PROMPTS[2]
    assert "".join(c.choices[0].text for c in chunks) == whole.choices[0].text
    streamed = [lp for c in chunks if c.choices[0].logprobs for lp in c.choices[0].logprobs.token_logprobs]
    expected = whole.choices[0].logprobs.token_logprobs
    assert streamed[0] is None and expected[0] is None and streamed[1:] == pytest.approx(expected[1:], abs=1e-6)
    plain = client.completions.create(model="task0", prompt=PROMPTS[2], max_tokens=5, temperature=0)
    assert whole.choices[0].text == PROMPTS[2] + plain.choices[0].text


@pytest.mark.parametrize("extra, words", [
    ({"max_tokens": 0}, "only with echo"),
    ({"best_of": 3}, "best_of 3 is not supported"),
    ({"suffix": " the end"}, "suffix"),
])
def test_what_completions_do_not_do_is_refused_not_ignored(client, extra, words):
    with pytest.raises(openai.UnprocessableEntityError) as err:
        client.completions.create(model="task0", prompt="fox", **{"max_tokens": 3, **extra})
    assert words in err.value.body["message"]


def test_best_of_equal_to_n_is_accepted(client):
    assert len(client.completions.create(model="task0", prompt="fox", max_tokens=2, n=2, best_of=2).choices) == 2


def test_one_model_is_retrieved_by_name_and_an_unknown_one_is_a_404(client, toy):
    card = client.models.retrieve("task0")
    assert card.id == "task0" and card.object == "model" and card.owned_by == "lorakit"
    assert client.models.retrieve("base").id == "base"
    with pytest.raises(openai.NotFoundError) as err:
        client.models.retrieve("nope")
    assert "not found" in err.value.body["message"] and "task0" in err.value.body["message"]


def adjusted_greedy(toy, adapter: str, prompt_ids: list[int], max_tokens: int, repetition: float, frequency: float,
                    presence: float) -> list[int]:
    """Greedy tokens by hand with vLLM's penalties: repetition over the prompt's and the answer's
    tokens (a positive logit divided, a negative one multiplied), frequency and presence over the answer's."""
    model = toy["refs"].model(toy["root"] / adapter)
    ids, answer = list(prompt_ids), []
    with torch.inference_mode():
        for _ in range(max_tokens):
            logits = model(input_ids=torch.tensor([ids])).logits[0, -1].double()
            for token in set(ids):
                logits[token] = logits[token] / repetition if logits[token] > 0 else logits[token] * repetition
            for token in set(answer):
                logits[token] -= frequency * answer.count(token) + presence
            token = int(logits.argmax())
            if token == toy["tokenizer"].eos_token_id:
                break
            answer.append(token)
            ids.append(token)
    return answer


def test_vllm_sampling_options_change_the_answer_as_they_say(client, toy):
    tokenizer = toy["tokenizer"]
    prompt = tokenizer.encode(PROMPTS[1])
    want = adjusted_greedy(toy, "task1", prompt, 10, 1.5, 0.8, 0.4)
    assert want != [t for t, _, _ in greedy_steps(toy, "task1", prompt, 10, 1)]  # the penalties do change it
    got = client.completions.create(model="task1", prompt=prompt, max_tokens=10, temperature=0, logprobs=0,
                                    frequency_penalty=0.8, presence_penalty=0.4,
                                    extra_body={"repetition_penalty": 1.5})
    assert got.choices[0].logprobs.tokens == [tokenizer.decode([t]) for t in want]
    plain = greedy_steps(toy, "task0", prompt, 6, 1)
    forced = client.completions.create(model="task0", prompt=prompt, max_tokens=4, temperature=0,
                                       logit_bias={str(plain[0][0] + 1): 100}, logprobs=0)
    assert forced.choices[0].logprobs.tokens == [tokenizer.decode([plain[0][0] + 1])] * 4
    stopped = client.completions.create(model="task0", prompt=prompt, max_tokens=6, temperature=0,
                                        extra_body={"stop_token_ids": [plain[2][0]]})
    assert stopped.choices[0].text == tokenizer.decode([plain[0][0], plain[1][0]])
    assert stopped.choices[0].finish_reason == "stop"
    eos = {str(tokenizer.eos_token_id): 100}
    assert client.completions.create(model="task0", prompt=prompt, max_tokens=6, temperature=0,
                                     logit_bias=eos).usage.completion_tokens == 1  # the end at once
    held = client.completions.create(model="task0", prompt=prompt, max_tokens=6, temperature=0, logit_bias=eos,
                                     extra_body={"min_tokens": 3})
    assert held.usage.completion_tokens == 4 and held.choices[0].finish_reason == "stop"  # 3 tokens, then the end
