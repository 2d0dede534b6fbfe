"""The paper's analyses: CKA alignment of task updates (Sec. 3) and scaling with the number of tasks (Sec. 5.4)."""
