"""`lorakit generate`: answer prompts with a chat or text model and its trained adapters."""

from __future__ import annotations

from lorakit.tasks import TASKS


def positive_int(text: str) -> int:
    """An argparse type: a whole number of at least 1 (argparse prints the message, exit 2)."""
    import argparse

    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} is less than 1; give how many tokens to generate")
    return value


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "generate", help="generate text with a trained chat/text adapter (or the base model)",
        description="Greedy generation. A chat model gets each prompt as a user turn through its chat template. "
                    "Several --adapter flags answer one after the other; with --merge they are summed into the "
                    "base weights and answer once. Without --adapter the base model answers.",
    )
    parser.add_argument("--adapter", action="append", default=[], metavar="DIR",
                        help="a run folder of lorakit train (--out), or the adapter (or full model) folder in it; "
                             "repeat for several")
    parser.add_argument("prompts", nargs="*", metavar="PROMPT", help="prompts to answer (as lorakit predict takes texts)")
    parser.add_argument("--prompt", action="append", default=[], help="a prompt; repeat for several")
    parser.add_argument("--merge", action="store_true", help="merge the adapters into the base weights")
    parser.add_argument("--model", default=None, help="base model: 'default' or a folder (default: the adapter's)")
    parser.add_argument("--task", choices=[name for name, task in sorted(TASKS.items()) if not task.trains_head],
                        default="chat", help="how to prompt the base model when no --adapter is given")
    parser.add_argument("--chat-template", default=None, metavar="NAME|FILE",
                        help="the chats' template instead of the base tokenizer's (e.g. a base model's, which has "
                             "none): chatml, a Jinja template file, or a run folder trained with --chat-template; "
                             "an adapter's own template wins")
    parser.add_argument("--max-new-tokens", type=positive_int, default=64, help="tokens to generate at most")
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda")
    parser.set_defaults(func=run)


def run(args) -> int:
    from lorakit.distributed import pick_device
    from lorakit.errors import LorakitError
    from lorakit.inference import generate, load_trained
    from lorakit.run_folder import adapter_folder  # a run folder of lorakit train stands for its adapter/

    prompts = [*args.prompts, *args.prompt]
    if not prompts:
        raise LorakitError("give a prompt to answer: lorakit generate --adapter DIR 'your prompt' (or --prompt TEXT)")
    template = args.chat_template and str(adapter_folder(args.chat_template))
    trained = load_trained(args.adapter, merge=args.merge, model=args.model, task=args.task,
                           device=pick_device(args.device), chat_template=template)
    results = generate(trained, prompts, args.max_new_tokens)
    for name, answers in results.items():
        for prompt, answer in zip(prompts, answers):
            print(f"[{name}] {prompt}\n{answer}\n")
    return 0
