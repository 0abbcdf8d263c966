"""Graph passes over a captured decoder LM (unit discovery, routing rewrite).

A pass is a plain function ``(GraphModule, ...) -> PassResult``; pipelines are
explicit lists of passes. See DESIGN.md §2.
"""
