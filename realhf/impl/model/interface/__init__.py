"""Model interfaces: the algorithms model function calls run. Importing this
package registers them."""

from realhf.impl.model.interface import (  # noqa: F401
    dpo_interface,
    gen_interface,
    grpo_interface,
    ppo_interface,
    rw_interface,
    sft_interface,
)
import realhf.impl.reward  # noqa: F401  (registers "rule_reward")
