"""The package version: a leaf module (imports nothing), read by ``attnlab/__init__.py`` and by
anything that records provenance, so none of them has to import the package itself."""

__version__ = "0.1.0"
