"""Mail: the one interface every sender uses (:class:`Mailer`), over SMTP or, without SMTP settings, the log."""

from .mailer import LogMailer, Mailer, MailError, SmtpConfig, SmtpMailer, build_mailer

__all__ = ["LogMailer", "MailError", "Mailer", "SmtpConfig", "SmtpMailer", "build_mailer"]
