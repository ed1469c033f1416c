from django.urls import path

from users import views

urlpatterns = [
    path("auth/csrf", views.csrf, name="auth-csrf"),
    path("auth/login", views.login_view, name="auth-login"),
    path("auth/logout", views.logout_view, name="auth-logout"),
]
