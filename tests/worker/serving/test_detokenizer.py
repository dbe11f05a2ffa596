"""Incremental text: what each token adds, never half a character."""

from worker.serving.detokenizer import TextStream


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
