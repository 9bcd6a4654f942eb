"""Whole datasets on Ray: ``olmo-tap batch generate|verify|audit`` (``cli``), the Ray Data job (``job``), what
each worker does (``work``) and the job's files (``files``)."""
