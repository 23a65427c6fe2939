"""The graph layer: what every compression pass knows about an ONNX graph and how it edits one.

``channels`` computes which channels of which tensors are coupled (one typed rule per op
family), and ``surgery`` removes channels and folds compensation by applying those rules. The
package itself imports nothing: load the submodule you need.
"""
