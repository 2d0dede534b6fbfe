"""Tasks: labelled datasets defined by config (readers, label mapping, seeded splits) and the joint label space."""

from knots.data.tasks import Example, JointLabelSpace, TaskData

__all__ = ["Example", "JointLabelSpace", "TaskData"]
