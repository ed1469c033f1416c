"""Background work of the organization domain as django.tasks tasks.

Enqueued by the services inside their transactions: the outbox's task
backend (outbox.tasks) writes each task with the domain's rows, so a
rollback leaves no task and a commit leaves exactly one, which
run_outbox_worker runs.
"""

from uuid import UUID

from django.tasks import TaskContext, task

from organizations import emails
from organizations.models import Membership, Project


@task(takes_context=True)
def send_project_welcome_digest(
    context: TaskContext, project_id: int
) -> dict[str, int]:
    """Mail the project's creator a digest of the organization it joined.

    Returns what the digest counted (the task's result). A project deleted,
    or whose creator is gone or deactivated, sends nothing.
    """
    project = (
        Project.objects.select_related("organization", "created_by")
        .filter(pk=project_id)
        .first()
    )
    if project is None or project.created_by is None:
        return {"sent": 0}
    creator = project.created_by
    if not creator.is_active:
        return {"sent": 0}
    organization = project.organization
    counts = {
        "members": Membership.objects.filter(organization=organization).count(),
        "projects": Project.objects.filter(organization=organization).count(),
    }
    emails.send(
        "project_welcome",
        to=creator.email,
        context={
            "user": creator,
            "project": project,
            "organization": organization,
            **counts,
        },
        # The task's id: a rerun after a crash sends the same Message-ID.
        event_uuid=UUID(context.task_result.id),
    )
    return {"sent": 1, **counts}
