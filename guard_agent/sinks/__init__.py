"""SIEM delivery: stdout stays primary; syslog (RFC 5424, TCP/TLS) and HTTP sinks get a copy of every event.

Each sink has a bounded queue, a disk spool under ``spool_dir`` and a sender that retries
with backoff; delivery is in order and at least once per sink. ``make_sink`` is what
``guard_agent.app`` calls.
"""

from guard_agent.sinks._alarm import Alarm
from guard_agent.sinks._config import HttpSinkConfig, SinkConfig, SyslogSinkConfig, TlsConfig, parse_sinks
from guard_agent.sinks._fanout import FanoutSink, make_sink, make_transport
from guard_agent.sinks._http import HttpTransport, encode_batch
from guard_agent.sinks._metrics import SinkMetrics
from guard_agent.sinks._spool import Appended, Batch, Spool, SpoolLockedError
from guard_agent.sinks._syslog import SyslogTransport, format_rfc5424, frame
from guard_agent.sinks._transport import DeliveryError, Transport
from guard_agent.sinks._worker import SinkWorker

__all__ = [
    "Alarm",
    "Appended",
    "Batch",
    "DeliveryError",
    "FanoutSink",
    "HttpSinkConfig",
    "HttpTransport",
    "SinkConfig",
    "SinkMetrics",
    "SinkWorker",
    "Spool",
    "SpoolLockedError",
    "SyslogSinkConfig",
    "SyslogTransport",
    "TlsConfig",
    "Transport",
    "encode_batch",
    "format_rfc5424",
    "frame",
    "make_sink",
    "make_transport",
    "parse_sinks",
]
