"""captioner: Flickr8k image captioning as a reproducible DVC / Airflow / MLflow pipeline.

Rooms by job, layered top to bottom (a module imports only from its own room or below; the
import-linter contract in pyproject.toml checks it in the test suite):

    cli                         `captioner ...`: dispatches to the rooms below
    stages | app | ops          the DVC stages; the web app; launchers, the team stack, Airflow tasks
    search | alttext | feedback a photo folder's index and text search; alt text for web pages;
                                people's ratings and corrections, exported as training data
    registry                    MLflow tracking, the champion, the pyfunc model
    captioning                  vocabulary, CNN backbone, decoder, decoding, reranking, metrics
    data                        archives, dataset layouts, parsers, images, validation rules
    config paths atomic cpu         the ground floor: settings, locations, atomic writes, the machine,
    logs errors                     one logging setup, the error entry points print as it is
"""
