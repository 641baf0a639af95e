"""Text streaming with stop strings: pieces add up, a held prefix is released, a cut
multibyte character is held back."""

from lorakit.serve.detokenize import TextStream


class CharTokenizer:
    """Token id i decodes to chr(i); 0 is a special token that decodes to nothing."""

    def decode(self, ids, skip_special_tokens=True):
        return "".join(chr(i) for i in ids if i != 0)


def feed(stream: TextStream, text: str) -> list[str]:
    return [stream.add(ord(c)) for c in text]


def test_stream_pieces_add_up_and_stop_before_the_stop_string():
    stream = TextStream(CharTokenizer(), stop=["END", "##"])
    pieces = feed(stream, "hello EN")
    assert "".join(pieces) == "hello "  # "EN" might become "END": held back
    pieces += feed(stream, "D more")
    assert stream.stopped
    assert "".join(pieces) + stream.finish() == "hello " == stream.text


def test_stream_releases_a_held_prefix_that_did_not_become_a_stop():
    stream = TextStream(CharTokenizer(), stop=["END"])
    pieces = feed(stream, "ENx")
    assert pieces == ["", "", "ENx"] and not stream.stopped


def test_stream_holds_back_a_cut_multibyte_character():
    class Cut(CharTokenizer):
        def decode(self, ids, skip_special_tokens=True):
            return super().decode(ids) + ("\ufffd" if len(ids) == 2 else "")

    stream = TextStream(Cut())
    assert stream.add(ord("a")) == "a"
    assert stream.add(ord("b")) == "b"  # the trailing replacement char is not emitted
    assert stream.add(ord("c")) == "c"

