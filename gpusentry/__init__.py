"""gpusentry core: the event contract, configuration, CLI and embedded broker.

The architecture is visible at the repository root:

* ``agents/``    host agents that collect GPU, process, network and DNS events;
* ``streams/``   the faust application that feeds Kafka topics to the engine;
* ``detectors/`` the detection engine (plain Python, no faust);
* ``outputs/``   alert delivery (dispatcher plus one formatter per destination);
* ``gpusentry/`` the small core every other package depends on.
"""

__version__ = "0.1.0"
