"""Transport: the wire protocol, the Channel every communicator call goes through, the waits
that do not burn a core, and the payload paths (by message, or through the shared window)."""
from .channel import Channel
from .paths import MessagePath, PayloadPath, SharedPath, open_server_paths, open_worker_path
from .shm import SharedWindow
from .waits import Waiter, transfer_idle_s
from .wire import HEADER_LEN, Field, Flag, Op, Status, Tag, fill_header, loss_of, new_header

__all__ = ["Channel", "Waiter", "PayloadPath", "MessagePath", "SharedPath", "SharedWindow",
           "open_server_paths", "open_worker_path", "Tag", "Op", "Status", "Field", "Flag",
           "HEADER_LEN", "new_header", "fill_header", "loss_of", "transfer_idle_s"]
