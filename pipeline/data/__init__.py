"""The data room: everything that reads or writes a dataset before any model sees it.

Holds: archive download and safe extraction (``archives``), bringing a folder into the one
Flickr8k layout (``dataset_layout``), the Flickr8k file parsers (``flickr8k``), the embedded
synthetic dataset (``synthetic``), image decoding (``images``), caption cleaning
(``caption_text``), the validation rules and their Great Expectations suites
(``validation_rules``) and the features file format (``features_file``).

May import: the ground floor (``pipeline.config``, ``paths``, ``atomic``, ``cpu``, ``logs``).
"""
