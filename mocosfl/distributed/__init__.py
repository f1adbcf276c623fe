"""MocoSFL with its clients and server in separate processes, on torch.distributed (c10d, gloo).

``distributed.client_hosts: W`` > 0 runs the server as rank 0 and W client hosts as ranks 1..W, launched
by ``torchrun`` (``launch``); ``roles`` holds the two trainers and the wire protocol, ``worker`` is what
each rank runs. The in-process simulation (``client_hosts: 0``) is the default.
"""
