"""The platform's own protobuf messages: ``umbel/v1/monitor.proto`` (the run's events and the
live ``Monitor`` service). The ``*_pb2*.py`` modules are generated from it (``make proto``)
and committed; a test fails when they no longer match the ``.proto``."""
