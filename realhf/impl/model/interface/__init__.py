"""Model interfaces: the algorithms model function calls run. Importing this
package registers them."""

from realhf.impl.model.interface import ppo_interface, sft_interface  # noqa: F401
