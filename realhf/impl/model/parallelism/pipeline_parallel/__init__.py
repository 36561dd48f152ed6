"""Pipeline parallelism: instructions, static schedules and stage-to-stage
communication."""
