from django.urls import path

from organizations import views

urlpatterns = [
    path("organizations", views.organizations, name="organizations"),
    path(
        "organizations/<slug:slug>/invitations",
        views.invitations,
        name="organization-invitations",
    ),
    path(
        "organizations/<slug:slug>/invitations/<int:invitation_id>",
        views.invitation,
        name="organization-invitation",
    ),
    path("invitations/accept", views.accept_invitation, name="invitation-accept"),
    path(
        "organizations/<slug:slug>/members",
        views.members,
        name="organization-members",
    ),
    path(
        "organizations/<slug:slug>/members/<int:user_id>",
        views.member,
        name="organization-member",
    ),
    path(
        "organizations/<slug:slug>/projects",
        views.projects,
        name="organization-projects",
    ),
]
