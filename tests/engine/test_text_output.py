"""Stop strings on detokenized text: matched across token boundaries, cut from the output, never streamed.

The detokenizer here maps token t to chr(t), so a test can spell its tokens; the engine plugs in the real one
(tests/engine/test_text.py).
"""

from __future__ import annotations

from s1serve.engine.text_output import TextOutput


class Chars:
    def feed(self, token_id: int) -> str:
        return chr(token_id)

    def finish(self) -> str:
        return "!"


def feed(text: TextOutput, pieces: list[str]) -> tuple[str | None, list[str]]:
    stream, stop = [], None
    for piece in pieces:
        for ch in piece:
            stop = text.append(ord(ch))
            if stop is not None:
                break
        stream.append(text.delta(finished=stop is not None))
        if stop is not None:
            break
    return stop, stream


def test_a_stop_string_spanning_tokens_is_cut_and_never_streamed():
    text = TextOutput(Chars(), ("END",))
    stop, stream = feed(text, ["ab", "cE", "N", "Dxyz"])
    text.finish()  # a stop string ended the text: nothing pending is added
    assert stop == "END" and text.text == "abc" and "".join(stream) == "abc"
    assert all("E" not in s for s in stream)


def test_held_back_text_is_released_when_it_does_not_become_a_stop():
    text = TextOutput(Chars(), ("END", "STOP"))
    stop, stream = feed(text, ["aS", "T", "x", "E", "Nd"])
    assert stop is None and text.text == "aSTxENd"
    text.finish()
    assert "".join(stream) + text.delta(finished=True) == "aSTxENd!"
    assert stream == ["a", "", "STx", "", "ENd"]  # "S", "ST", "E" could start a stop string: held back


def test_the_earliest_stop_wins():
    text = TextOutput(Chars(), ("cd", "bcde"))
    assert text.append(ord("a")) is None and text.append(ord("b")) is None and text.append(ord("c")) is None
    assert text.append(ord("d")) == "cd" and text.text == "ab"


def test_without_a_detokenizer_there_is_no_text():
    text = TextOutput(None, ())
    assert text.append(5) is None and text.delta(finished=True) == ""
