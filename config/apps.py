from django.apps import AppConfig


class ProjectConfig(AppConfig):
    """The project itself, installed so that its system checks are registered."""

    name = "config"
    verbose_name = "Project configuration"

    def ready(self) -> None:
        from config import checks  # noqa: F401 - registers the checks
