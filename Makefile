# make demo   set up and send the sample mailing through the outbox (SQLite, no cloud)
# make test   set up and run the whole test suite (needs PostgreSQL and Redis)
VENV ?= .venv

.PHONY: demo test

demo:
	scripts/bootstrap.sh demo
	$(VENV)/bin/flask --app wsgi cloudmail db upgrade
	$(VENV)/bin/flask --app wsgi cloudmail send --recipients examples/data/moodle_users_5k.csv \
		--subject 'Welcome, {{ firstname }}' --html examples/welcome.html

test:
	scripts/bootstrap.sh test
	cd lambda && node --test test/
	$(VENV)/bin/python -m pytest
