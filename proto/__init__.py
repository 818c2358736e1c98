"""The platform's own protobuf messages (run record events, the live monitor service).

The ``.proto`` sources and the modules generated from them arrive with the deployment work
(issue 4); nothing imports this package yet.
"""
