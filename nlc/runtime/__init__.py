"""Hand-written primitives imported by generated nlc code.

Generated modules import only ``torch`` and this package.
"""
