"""The captioning room: from pixels to a chosen sentence, and how sentences are scored.

Holds: the vocabulary (``vocabulary``), the CNN backbone and its runtimes (``backbone``), the
LSTM decoder, with or without attention over a grid of regions, its trainer and attention maps
(``decoder``), the picture of where it looked for each word (``attention_strip``), greedy / beam / sampled decoding (``decoding``),
consensus reranking (``consensus``), the one function that chooses an image's captions from the
typed decoding settings (``caption_choice``), CIDEr-D (``cider``), self-critical training
(``self_critical``), corpus metrics (``metrics``), per-image scores and the paired bootstrap
(``comparison``), the HTML gallery of test captions (``gallery``), and how sure a caption is and
when to abstain (``confidence``: its signals, the calibration, the words people are told).

May import: ``pipeline.data`` and the ground floor. Never MLflow, Airflow or the web app.
"""
