"""Running a plan: the parallel module (``module``), gradient reduction (``grad_sync``), ZeRO (``zero``),
the host optimizer (``host_optimizer``), mixed precision (``precision``), the pipeline runtime (``pipeline``),
distributed checkpoints (``checkpoint``), process-group start-up (``distributed``), rank failures
(``faults``) and measured memory (``memory``). Sits above the solver and codegen; never plans.
"""
