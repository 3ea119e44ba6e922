"""The ground floor every other package stands on: errors the user can fix (errors), an exception quoted in
one line (text), files written atomically (fileio), Ctrl-C/SIGTERM as a polled stop request (signals),
device-honest clocks (clock) and where a run executes: device, seeding, machine record, compile cache
(runtime). Imports nothing else from cifarlab. The torch-free names are here; `clock` and `runtime` import
torch and are imported by name."""

from cifarlab.core.errors import DataError, UsageError
from cifarlab.core.fileio import read_json, write_bytes_atomic, write_csv_atomic, write_json_atomic, write_text_atomic
from cifarlab.core.signals import StopOnSignal
from cifarlab.core.text import one_line

__all__ = [
    "DataError", "StopOnSignal", "UsageError", "one_line", "read_json", "write_bytes_atomic", "write_csv_atomic", "write_json_atomic",
    "write_text_atomic",
]
