from pipeline.data.caption_text import clean_caption


def test_cleaning_lowercases_and_keeps_alphabetic_tokens():
    assert clean_caption("A child in a pink dress , climbing 2 stairs .") == \
        "a child in a pink dress climbing stairs"


def test_cleaning_splits_hyphens_and_possessives_and_drops_single_letters():
    assert clean_caption("A dog's red t-shirt") == "a dog red shirt"


def test_cleaning_strips_accents_and_quotes():
    assert clean_caption('The "Café" sign') == "the cafe sign"


def test_punctuation_only_caption_cleans_to_empty():
    assert clean_caption(" . , ! ") == ""


def test_references_by_image_group_a_split_in_name_order():
    import pandas as pd

    from pipeline.data.caption_text import references_by_image

    table = pd.DataFrame({"image": ["b.jpg", "a.jpg", "b.jpg", "c.jpg"], "split": ["train", "train", "train", "dev"],
                          "caption": ["a dog runs", "a cat", "the dog", "a bird"]})
    names, references = references_by_image(table, "train")
    assert names == ["a.jpg", "b.jpg"]
    assert references == [[["a", "cat"]], [["a", "dog", "runs"], ["the", "dog"]]]
    assert references_by_image(table, "test") == ([], [])
