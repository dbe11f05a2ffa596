"""Incremental text: what each token adds, never half a character."""

import pytest

from worker.serving.detokenizer import StopText, TextStream


def test_pieces_join_to_the_whole_text_and_hidden_tokens_add_nothing(smollm):
    tokenizer = smollm[1]
    ids = tokenizer.encode("Ice, ça fond: 氷 🧊 melts.")
    eos = next(iter(tokenizer.eos_token_ids))
    stream = TextStream(tokenizer, frozenset({eos}))
    pieces = [stream.push(i) for i in [*ids, eos]]
    assert "".join(pieces) == tokenizer.decode(ids) == "Ice, ça fond: 氷 🧊 melts."
    assert pieces[-1] == ""
    assert all("\ufffd" not in p for p in pieces)
    assert "" in pieces[:-1]  # a multi-byte character spans tokens: it waits for the last


@pytest.mark.parametrize(
    ("pieces", "stops", "out", "stopped"),
    [
        (["Hello", " wor", "ld"], ("world",), ["Hello", " ", ""], True),
        (["Hello", " wor", "ds"], ("world",), ["Hello", " ", "words"], False),
        (["ab", "cEN", "Dxyz"], ("END",), ["ab", "c", ""], True),
        (["x</", "s", ">tail"], ("</s>", "##"), ["x", "", ""], True),
        (["a#", "b#", "#c"], ("</s>", "##"), ["a", "#b", ""], True),
        (["one STOP two"], ("STOP", "one"), [""], True),  # the first one in the text wins
        (["plain text"], (), ["plain text"], False),
    ],
)
def test_stop_strings_cut_the_text_exactly_before_them_and_never_stream_them(
    pieces, stops, out, stopped
):
    stream = StopText(stops)
    sent = []
    for piece in pieces:
        sent.append(stream.push(piece))
        if stream.stopped:
            break
    assert sent == out
    assert stream.stopped == stopped
    if not stopped:
        assert "".join(sent) + stream.held == "".join(pieces)


def test_an_empty_stop_string_is_refused():
    with pytest.raises(ValueError, match="must not be empty"):
        StopText(("x", ""))
