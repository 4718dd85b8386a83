"""The case state machine: every status change of a Case goes through :func:`check_transition`.

    received -> queued -> analysing -> preliminary -> in_review -> final -> amended
                   ^          |              \\______________________/
                   |          +--> in_review   (AI output unusable: straight to a dermatologist)
                   +-- failed <-- (received | queued | analysing)
    any non-withdrawn state -> withdrawn  (patient withdraws or erases)
"""

from __future__ import annotations

import enum


class CaseStatus(str, enum.Enum):
    received = "received"  # photos stored, history being collected
    queued = "queued"  # submitted to the AI pipeline
    analysing = "analysing"  # a worker is on it
    preliminary = "preliminary"  # AI assessment ready; not a diagnosis
    in_review = "in_review"  # waiting for / with a dermatologist
    final = "final"  # signed by a dermatologist
    amended = "amended"  # signed, then changed by a dermatologist
    withdrawn = "withdrawn"  # patient withdrew
    failed = "failed"  # could not be processed; reason recorded


TRANSITIONS: dict[CaseStatus, frozenset[CaseStatus]] = {
    CaseStatus.received: frozenset({CaseStatus.queued, CaseStatus.failed, CaseStatus.withdrawn}),
    CaseStatus.queued: frozenset({CaseStatus.analysing, CaseStatus.failed, CaseStatus.withdrawn}),
    CaseStatus.analysing: frozenset(
        {CaseStatus.preliminary, CaseStatus.in_review, CaseStatus.queued, CaseStatus.failed, CaseStatus.withdrawn}
    ),
    CaseStatus.preliminary: frozenset({CaseStatus.in_review, CaseStatus.withdrawn}),
    CaseStatus.in_review: frozenset({CaseStatus.final, CaseStatus.amended, CaseStatus.withdrawn}),
    CaseStatus.final: frozenset({CaseStatus.amended, CaseStatus.withdrawn}),
    CaseStatus.amended: frozenset({CaseStatus.amended, CaseStatus.withdrawn}),
    CaseStatus.failed: frozenset({CaseStatus.queued, CaseStatus.withdrawn}),
    CaseStatus.withdrawn: frozenset(),
}

# States in which the AI pipeline still owes work; the sweeper re-enqueues cases stuck here.
PIPELINE_STATES = frozenset({CaseStatus.queued, CaseStatus.analysing})
SIGNED_STATES = frozenset({CaseStatus.final, CaseStatus.amended})


class IllegalTransition(ValueError):
    def __init__(self, current: CaseStatus, target: CaseStatus):
        super().__init__(f"a case cannot go from {current.value} to {target.value}")
        self.current, self.target = current, target


def check_transition(current: CaseStatus | str, target: CaseStatus | str) -> CaseStatus:
    current, target = CaseStatus(current), CaseStatus(target)
    if target not in TRANSITIONS[current]:
        raise IllegalTransition(current, target)
    return target
