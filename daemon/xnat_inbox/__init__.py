"""xnat-inbox: a watch-folder daemon that delivers DICOM drops to XNAT."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("xnat-inbox")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0+unknown"
