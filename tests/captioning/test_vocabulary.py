from pipeline.captioning.vocabulary import SPECIAL_TOKENS, Vocabulary


def test_vocabulary_reserves_special_tokens_and_round_trips(tmp_path):
    vocab = Vocabulary.build(["a dog runs", "a cat runs", "a dog"], min_count=2, max_length=5)
    assert vocab.words[:4] == SPECIAL_TOKENS
    assert "cat" not in vocab.words  # seen once, below min_count
    assert vocab.encode("a cat runs") == [vocab.id("a"), vocab.unk_id, vocab.id("runs")]
    path = tmp_path / "vocab.json"
    path.write_text(vocab.to_text())
    assert Vocabulary.load(path) == vocab


def test_teacher_forcing_arrays_shift_by_one_and_pad():
    vocab = Vocabulary.build(["a dog runs"], min_count=1, max_length=4)
    inputs, targets = vocab.teacher_forcing_arrays(["a dog runs", "a dog runs fast and far"])
    a, dog, runs = (vocab.id(w) for w in ("a", "dog", "runs"))
    assert inputs[0].tolist() == [vocab.start_id, a, dog, runs, 0]
    assert targets[0].tolist() == [a, dog, runs, vocab.end_id, 0]
    assert inputs.shape == (2, 5) and targets[1, -1] == vocab.end_id  # truncated to max_length
    assert vocab.decode(targets[0]) == "a dog runs"
