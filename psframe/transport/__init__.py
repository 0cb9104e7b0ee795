"""Transport: the wire protocol, the Channel every communicator call goes through, the waits
that do not burn a core, the codecs of payload frames, and the links to each peer (by
message, or through the shared window)."""
from .channel import Channel
from .codecs import Codec, Identity, codec_for
from .links import (LINKS, Landing, Link, MessageLink, Sends, SharedLink, make_link,
                    open_server_links, open_worker_links)
from .shm import SharedWindow
from .waits import Waiter, transfer_idle_s
from .wire import HEADER_LEN, Field, Flag, Op, Status, Tag, fill_header, float_of, new_header

__all__ = ["Channel", "Waiter", "Link", "MessageLink", "SharedLink", "Landing", "Sends", "LINKS",
           "make_link", "SharedWindow", "Codec", "Identity", "codec_for",
           "open_server_links", "open_worker_links", "Tag", "Op", "Status", "Field", "Flag",
           "HEADER_LEN", "new_header", "fill_header", "float_of", "transfer_idle_s"]
