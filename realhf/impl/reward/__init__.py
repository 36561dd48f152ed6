"""Rule-based and function rewards computed from decoded text.

* :mod:`~realhf.impl.reward.math_verify`: final-answer extraction and checking.
* :mod:`~realhf.impl.reward.custom`: user reward functions loaded by file path and name.
* :mod:`~realhf.impl.reward.mixture`: named rewards and weighted mixtures (specs).
* :mod:`~realhf.impl.reward.pool`: scoring in worker processes with timeouts.
* :mod:`~realhf.impl.reward.interface`: the ``rule_reward`` model interface.

Importing this package registers ``rule_reward``.
"""

from realhf.impl.reward import interface  # noqa: F401  (registers "rule_reward")
from realhf.impl.reward.custom import load_reward_function
from realhf.impl.reward.math_verify import extract_answer, format_reward, math_reward
from realhf.impl.reward.mixture import RewardSpecError, build_mixture, register_reward
from realhf.impl.reward.pool import RewardError, RewardPool

__all__ = [
    "RewardError", "RewardPool", "RewardSpecError", "build_mixture", "extract_answer", "format_reward",
    "load_reward_function", "math_reward", "register_reward",
]
