"""What users call: ``api`` (``autopar.plan``, ``apply``, ``parallelize``) and ``pipeline`` (planning
pipeline stages and applying them). Wires capture -> solver -> codegen -> runtime.
"""
