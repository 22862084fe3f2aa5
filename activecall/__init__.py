"""activecall: a Twisted telephony daemon that puts AI voice agents on phone lines."""

__version__ = "0.1.0"
