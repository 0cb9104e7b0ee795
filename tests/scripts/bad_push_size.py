"""A raw push whose size does not match the layout: the server must refuse it, not corrupt."""
import numpy as np
from mpi4py import MPI

from psframe.nn.optim import SGD
from psframe.params import ParamLayout
from psframe.policies import Sync
from psframe.server import Group, ParameterServer
from psframe.transport import Channel, Field, Op, Tag, new_header

comm = MPI.COMM_WORLD
layout = ParamLayout({"w": (10,)})
if comm.rank == 0:
    server = ParameterServer(comm, layout, np.zeros(10, np.float32),
                             optimizer=SGD(lr=0.1), groups=[Group(Sync().state(1), [0], (0, 1))],
                             worker_ranks=[1])
    try:
        server.run()
    except Exception:
        assert np.all(server.weights == 0.0), "weights changed by a refused push"
        raise
else:
    h = new_header()
    h[Field.OP], h[Field.SHARD_LO], h[Field.SHARD_HI], h[Field.COUNT] = Op.PUSH, 0, 1, 7
    Channel(comm, layout).send_header(h, 0, Tag.REQUEST)
    comm.Send(np.ones(7, np.float32), dest=0, tag=Tag.PUSH)
    comm.Recv(np.empty(1), source=0, tag=Tag.REPLY)  # never answered: the abort ends us
