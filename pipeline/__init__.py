"""captioner: Flickr8k image captioning as a reproducible pipeline."""

__version__ = "0.1.0"
