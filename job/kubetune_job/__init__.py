"""kubetune's training job: fine-tunes a Hugging Face model as a FineTuneJob spec says."""

__version__ = "0.1.0"
