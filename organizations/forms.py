"""Input of the JSON API, validated with Django forms."""

from django import forms

from organizations.models import Role


class OrganizationForm(forms.Form):
    name = forms.CharField(max_length=200)
    slug = forms.SlugField(max_length=64)


class InvitationForm(forms.Form):
    # Invitation.email's column holds 254 characters (RFC 5321's limit on a
    # path); the form field's default is 320.
    email = forms.EmailField(max_length=254)
    role = forms.ChoiceField(choices=Role.choices)


class AcceptInvitationForm(forms.Form):
    token = forms.CharField(max_length=500)
    password = forms.CharField(strip=False, max_length=200)


class RoleForm(forms.Form):
    role = forms.ChoiceField(choices=Role.choices)


class ProjectForm(forms.Form):
    name = forms.CharField(max_length=200)
