from django.contrib import admin
from django.urls import include, path

from outbox.metrics import metrics_view

urlpatterns = [
    path("admin/", admin.site.urls),
    path("api/", include("users.urls")),
    path("api/", include("organizations.urls")),
    # publish()'s counters for Prometheus: 404 until OUTBOX_METRICS_TOKEN is
    # set, then only to "Authorization: Bearer <token>".
    path("outbox/metrics", metrics_view, name="outbox-metrics"),
]

handler400 = "config.api.bad_request"
handler403 = "config.api.permission_denied"
handler404 = "config.api.not_found"
handler500 = "config.api.server_error"
