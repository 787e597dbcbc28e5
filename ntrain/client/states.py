"""Job state names as people write them ("RUNNING") and the contract's enum values.

The proto prefixes each value with its type (`JOB_STATE_RUNNING`), as protobuf
style asks so values of different enums cannot collide in one package; the
command line, the store and error messages use the short name.
"""

from typing import cast

from ntrain.v1 import training_pb2

_PREFIX = "JOB_STATE_"

# Every state a job can be in, in the contract's order (not UNSPECIFIED).
STATE_NAMES: tuple[str, ...] = tuple(
    name.removeprefix(_PREFIX)
    for name in training_pb2.JobState.keys()
    if name != "JOB_STATE_UNSPECIFIED"
)


def state_name(value: int) -> str:
    """The short name of a JobState value: `JOB_STATE_RUNNING` -> "RUNNING"."""
    return training_pb2.JobState.Name(value).removeprefix(_PREFIX)


def state_value(name: str) -> training_pb2.JobState:
    """The JobState value of "running", "RUNNING" or "JOB_STATE_RUNNING".

    Raises:
        ValueError: no job state has that name.
    """
    short = name.strip().upper().removeprefix(_PREFIX)
    if short not in STATE_NAMES:
        raise ValueError(f"no job state is called {name!r}; one of {', '.join(STATE_NAMES)}")
    # The stubs type the enum as an int subclass, Value() as a plain int.
    return cast(training_pb2.JobState, training_pb2.JobState.Value(_PREFIX + short))
