"""The contract between the FineTuneJob's job, its operator and its command line: pydantic models and
constants only, importing nothing else of kubetune's."""
