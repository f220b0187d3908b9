from pipeline.text import SPECIAL_TOKENS, Vocabulary, clean_caption


def test_cleaning_lowercases_and_keeps_alphabetic_tokens():
    assert clean_caption("A child in a pink dress , climbing 2 stairs .") == \
        "a child in a pink dress climbing stairs"


def test_cleaning_splits_hyphens_and_possessives_and_drops_single_letters():
    assert clean_caption("A dog's red t-shirt") == "a dog red shirt"


def test_cleaning_strips_accents_and_quotes():
    assert clean_caption('The "Café" sign') == "the cafe sign"


def test_punctuation_only_caption_cleans_to_empty():
    assert clean_caption(" . , ! ") == ""


def test_vocabulary_reserves_special_tokens_and_round_trips(tmp_path):
    vocab = Vocabulary.build(["a dog runs", "a cat runs", "a dog"], min_count=2, max_length=5)
    assert vocab.words[:4] == SPECIAL_TOKENS
    assert "cat" not in vocab.words  # seen once, below min_count
    assert vocab.encode("a cat runs") == [vocab.id("a"), vocab.unk_id, vocab.id("runs")]
    path = tmp_path / "vocab.json"
    vocab.save(path)
    assert Vocabulary.load(path) == vocab


def test_teacher_forcing_arrays_shift_by_one_and_pad():
    vocab = Vocabulary.build(["a dog runs"], min_count=1, max_length=4)
    inputs, targets = vocab.teacher_forcing_arrays(["a dog runs", "a dog runs fast and far"])
    a, dog, runs = (vocab.id(w) for w in ("a", "dog", "runs"))
    assert inputs[0].tolist() == [vocab.start_id, a, dog, runs, 0]
    assert targets[0].tolist() == [a, dog, runs, vocab.end_id, 0]
    assert inputs.shape == (2, 5) and targets[1, -1] == vocab.end_id  # truncated to max_length
    assert vocab.decode(targets[0]) == "a dog runs"


def test_references_by_image_group_a_split_in_name_order():
    import pandas as pd

    from pipeline.text import references_by_image

    table = pd.DataFrame({"image": ["b.jpg", "a.jpg", "b.jpg", "c.jpg"], "split": ["train", "train", "train", "dev"],
                          "caption": ["a dog runs", "a cat", "the dog", "a bird"]})
    names, references = references_by_image(table, "train")
    assert names == ["a.jpg", "b.jpg"]
    assert references == [[["a", "cat"]], [["a", "dog", "runs"], ["the", "dog"]]]
    assert references_by_image(table, "test") == ([], [])
