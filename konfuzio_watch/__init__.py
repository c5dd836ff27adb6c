"""konfuzio-watch: a watch-folder daemon for the Konfuzio document-AI platform."""

__version__ = "0.1.0"
