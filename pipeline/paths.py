"""File locations shared by the stages; they mirror the outs/deps declared in dvc.yaml."""

from pathlib import Path

RAW_DIR = Path("data/raw")
DOWNLOADS_DIR = Path("data/downloads")  # archive cache for resumable downloads (not a DVC out)
PREPARED_DIR = Path("data/prepared")
CAPTIONS = PREPARED_DIR / "captions.parquet"
REJECTS = PREPARED_DIR / "rejects.parquet"
FEATURES_DIR = Path("data/features")
MODELS_DIR = Path("models")
DECODER = MODELS_DIR / "decoder.keras"
VOCAB = MODELS_DIR / "vocab.json"
TRAIN_RUN = MODELS_DIR / "train_run.json"
NEIGHBOURS = MODELS_DIR / "neighbours.npz"  # train images' features + captions (consensus reranking)
CONFIDENCE = MODELS_DIR / "confidence.json"  # the calibrated confidence and the novelty threshold
METRICS_DIR = Path("metrics")
EVAL_METRICS = METRICS_DIR / "eval.json"
REPORTS_DIR = Path("reports")
VALIDATION_REPORT = REPORTS_DIR / "validation.json"
FAILED_REJECTS = REPORTS_DIR / "validation_rejects.parquet"
TRAIN_HISTORY = REPORTS_DIR / "train_history.csv"
TRAIN_CURVE = REPORTS_DIR / "train_history.png"
SELF_CRITICAL_HISTORY = REPORTS_DIR / "self_critical_history.csv"
TEST_CAPTIONS = REPORTS_DIR / "test_captions.parquet"
TEST_SCORES = REPORTS_DIR / "test_scores.parquet"  # per-image scores: new model and champion
GALLERY = REPORTS_DIR / "gallery.html"
REGISTRY_REPORT = REPORTS_DIR / "registry.json"
CONFIDENCE_REPORT = REPORTS_DIR / "confidence.json"  # dev: calibration error, precision and coverage
RELIABILITY_PLOT = REPORTS_DIR / "reliability.png"
DEV_CONFIDENCE = REPORTS_DIR / "dev_confidence.parquet"  # per dev photo: caption, signals, confidence

TOKEN_FILE = "Flickr8k.token.txt"
KAGGLE_CAPTIONS = "captions.txt"
IMAGES_SUBDIR = "Images"
SPLIT_FILES = {
    "train": "Flickr_8k.trainImages.txt",
    "dev": "Flickr_8k.devImages.txt",
    "test": "Flickr_8k.testImages.txt",
}


def dataset_dir(source: str) -> Path:
    """data/raw/<dataset>/ for a data.source value."""
    return RAW_DIR / source


def features_file(backbone: str) -> Path:
    return FEATURES_DIR / f"{backbone}.parquet"


def feature_shard_file(backbone: str, shard: int | str) -> Path:
    """One shard's features (stage ``features@<shard>``), merged by ``merge_features``."""
    return FEATURES_DIR / "shards" / f"{backbone}-{shard}.parquet"


def feature_parts_dir(backbone: str, shard: int | str) -> Path:
    """Finished batches of an unfinished shard, so a rerun resumes (not a DVC out)."""
    return FEATURES_DIR / "parts" / f"{backbone}-{shard}"


def backbone_dir(backbone: str) -> Path:
    """The exact CNN used for the features (weights, TFLite model, resolved spec), bundled
    later into the served model."""
    return FEATURES_DIR / f"{backbone}.backbone"


FEEDBACK_DIR = Path("data/feedback")  # corrections exported by the feedback stage (Flickr8k layout)
FEEDBACK_CAPTIONS = FEEDBACK_DIR / "captions.parquet"  # the corrections validate's rules kept
FEEDBACK_REJECTS = FEEDBACK_DIR / "rejects.parquet"  # and those they quarantined, with the reason
FEEDBACK_REPORT = FEEDBACK_DIR / "validation.json"
FEEDBACK_SHARD = "feedback"  # the features of corrected photos: one more shard (feature_shard_file)
