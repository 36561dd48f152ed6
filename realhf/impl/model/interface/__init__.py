"""Model interfaces: the algorithms model function calls run. Importing this
package registers them (``sft``)."""

from realhf.impl.model.interface import sft_interface  # noqa: F401
