"""The PostgreSQL wire protocol, sans-IO: framing, builders, decoders."""

from .framing import ProtocolError, message_at, startup_packet_at  # noqa: F401
