"""A raw push flagged finite by its worker whose later frame is NaN: the server, applying
the push frame by frame as it lands, must end the run with a clear error. Run with
PSFRAME_STREAM=always: on one node pushes by message are not streamed by default."""
import numpy as np
from mpi4py import MPI

from psframe.nn.optim import SGD
from psframe.params import ParamLayout
from psframe.policies import Sync
from psframe.server import Group, ParameterServer
from psframe.transport import Channel, Field, Flag, Op, Tag, new_header

comm = MPI.COMM_WORLD
layout = ParamLayout({"a": (4,), "b": (4,), "c": (4,)}, shard_elems=4)  # 3 frames
if comm.rank == 0:
    server = ParameterServer(comm, layout, np.zeros(12, np.float32), optimizer=SGD(lr=0.1),
                             groups=[Group(Sync().state(1), [0], (0, layout.n_shards))],
                             worker_ranks=[1], transport="mpi")
    server.run()
    print("UNREACHABLE: the server accepted the push")
else:
    h = new_header()
    h[Field.OP], h[Field.SHARD_LO], h[Field.SHARD_HI] = Op.PUSH, 0, layout.n_shards
    h[Field.COUNT], h[Field.FLAGS] = 12, Flag.FINITE
    grad = np.ones(12, np.float32)
    grad[9] = np.nan  # in the last frame, after the first ones were applied
    channel = Channel(comm, layout)
    channel.send_header(h, 0, Tag.REQUEST)
    for a, b in layout.frames():
        comm.Send(grad[a:b], dest=0, tag=Tag.PUSH)
    comm.Recv(np.empty(1), source=0, tag=Tag.REPLY)  # never answered: the abort ends us
