"""Core types every other part of autopar builds on: errors, capture (torch.export -> graph), the graph
index, meshes, placements, plans and their JSON schema, and the typed options.

Floor 0: modules here import nothing of autopar's own beyond ``autopar.core`` and ``autopar.cluster.profile``
(the ClusterProfile a plan carries). They never plan, generate code or run anything distributed.
"""
